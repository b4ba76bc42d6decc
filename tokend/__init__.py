"""tokend: keeps OAuth tokens alive for unattended jobs.

Kept import-free so that client commands (`tokend token NAME`) start fast.
"""

__version__ = "0.1.0"
