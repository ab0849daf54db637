"""The alphabet of ids (rollouts, groups, tasks, datasets): they end up in URLs, SQL and logs."""

import re

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}"
_ID_RE = re.compile(rf"^{ID_PATTERN}$")
ID_RULE = "up to 200 letters, digits and . _ : @ -, starting with a letter or digit"


def is_valid_id(value: str) -> bool:
    return _ID_RE.match(value) is not None
