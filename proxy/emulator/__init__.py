"""Local stand-ins for the AML scoring front end and control planes, for development and tests."""
