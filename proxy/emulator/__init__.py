"""Local stand-ins for the AML scoring front end and control planes, Entra ID and IMDS, and ML Server login."""
