"""The Kettle app and its command line."""
