"""admin_client_patch package."""
