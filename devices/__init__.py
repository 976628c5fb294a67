"""Device profiles shipped with flashlm (TOML package data); see README.md here."""
