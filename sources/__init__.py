"""Event sources: one module per source kind (http, cron, aodh, zaqar, swift), loaded through the plugin registry."""
