"""core_admin_patch package."""
