"""The reporting layer: metrics, tables, plots, model cards and the machine a measurement ran on. It never
imports training."""
