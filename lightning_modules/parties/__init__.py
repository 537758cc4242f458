"""The two parties' workflows: the private fit, the head probe, heads and public states, and the export writer."""
