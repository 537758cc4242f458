"""Text datasets, hidden-state extraction, the on-disk state cache and LightningDataModules over it."""
