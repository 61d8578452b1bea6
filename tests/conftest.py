import os

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# transformers installs its logging handler on first import, bound to the sys.stderr of that
# moment. Imported first inside a test that captures stderr (tunefix imports it lazily), the
# handler kept that test's capture, closed at its end, and a later warning printed "--- Logging
# error ---" with a traceback into another test's output (measured). Configured here, once,
# while stderr is the session's.
from transformers.utils import logging as _transformers_logging  # noqa: E402

_transformers_logging.get_logger("transformers")
