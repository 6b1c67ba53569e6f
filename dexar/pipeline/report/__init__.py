"""`dexar report`: tables, figures and the paper numbers from finished runs and W&B."""
