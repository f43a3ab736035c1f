"""Optional integrations: web frameworks, metrics and tracing.

Each module imports its framework or library only when it is imported itself,
so none of them is a dependency of ``taskq``.
"""
