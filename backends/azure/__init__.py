"""Azure: the JWKS as a blob (publisher ``azblob``), the state as blobs (``azblob://`` store).

Azure Key Vault keys are planned but not shipped: no local Key Vault server
can be installed from the package registries keymgr's tests may use, and a
backend keymgr cannot test against a real server does not ship (see
docs/configuration/azure.md).
"""
