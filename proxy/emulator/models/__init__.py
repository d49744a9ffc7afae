"""Entry scripts for the real AML scoring server (azmlinfsrv); shipped as package data."""
