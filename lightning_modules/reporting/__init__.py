"""Reports and demo summaries: figures and tables, the demo summary, the two-party and OOD demo reports."""
