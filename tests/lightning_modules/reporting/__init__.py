"""Tests of reports and demo summaries (lightning_modules/reporting/)."""
