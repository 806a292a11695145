"""firewall_rules package."""
