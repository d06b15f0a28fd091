"""ScaleKD: SDF, the Cross-Scale Assistant, output losses, baselines and the distiller."""
