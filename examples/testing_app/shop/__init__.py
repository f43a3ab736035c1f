"""A small shop: orders are charged, and receipts mailed, in background jobs."""
