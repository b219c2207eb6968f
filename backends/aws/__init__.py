"""AWS: KMS keys, the JWKS as an S3 object, the state as an S3 object."""
