"""Which IAM role each user's requests get: one TenantRole row per user."""
