"""Test helpers: tiny offline stand-ins for downloads (tokenizers, models, data) and derived float tolerances."""
