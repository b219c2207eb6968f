"""Local files: encrypted private keys, the JWKS file, the state file."""
