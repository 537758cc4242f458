"""xsilo's tests: folders mirror the packages (encrypted, serve, datamodules, lightning_modules)."""
