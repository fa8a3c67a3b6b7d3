"""The Observatory Operations Data Service (LDM-230 2.6): a fast cache of recent data."""
