"""Raw-post ingestion: the post manifest (:mod:`.manifest`) and Weibo text cleaning (:mod:`.text`).

Image decoding lives in :mod:`sgmft.ingest.images`. jieba is imported only when text is
first segmented, so importing this package is cheap.
"""

from sgmft.ingest.manifest import ManifestError, Post, Reject, read_manifest, write_rejects
from sgmft.ingest.text import CleanConfig, TextCleaner, clean_text

__all__ = ["CleanConfig", "ManifestError", "Post", "Reject", "TextCleaner", "clean_text",
           "read_manifest", "write_rejects"]
