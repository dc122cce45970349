"""Test helpers shared by the unit and integration tests (and ``stag-relay sink``)."""
