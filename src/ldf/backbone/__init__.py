"""The Data Backbone (LDM-230 5.1): catalog, sites and tiers, replication, integrity, retention."""
