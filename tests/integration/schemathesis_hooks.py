"""Schemathesis hooks for the predictor's contract run (SCHEMATHESIS_HOOKS points here).

GET /predictions' `cursor` is opaque: any string is schema-valid, only a `next_cursor` the
API handed out is a cursor. Its `format` tells schemathesis to generate real ones, so that
"valid data is accepted" is checked for real (anything else is a 400 naming `cursor`).
"""

from __future__ import annotations

from datetime import UTC

import schemathesis
from hypothesis import strategies as st

from common.store.readback import encode_cursor
from services.predictor.openapi import CURSOR_FORMAT

schemathesis.openapi.format(
    CURSOR_FORMAT,
    st.builds(
        lambda ts, request_id: encode_cursor(ts, str(request_id)),
        st.datetimes(timezones=st.just(UTC)),
        st.uuids(),
    ),
)
