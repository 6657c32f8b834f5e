"""The laboratory: data, models, training, runs, plots and reports (imports core, diagnostics)."""
