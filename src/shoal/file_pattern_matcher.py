"""Modal's ``modal.file_pattern_matcher``, as code written for Modal imports it: ``FilePatternMatcher``."""

from shoal.wire.ignore import FilePatternMatcher

__all__ = ["FilePatternMatcher"]
