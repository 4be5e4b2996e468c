"""Private workdirs and files (0700 / 0600): the helpers live in ``core/private_files.py`` (dp_training and
federated use them too, and may not import pipeline); re-exported here for the pipeline's code."""
from core.private_files import (PRIVATE_UMASK, OpenDirectoryError, check_private_dir, open_bits,  # noqa: F401
                                owner_only, private_dir, private_umask, write_private_text)
