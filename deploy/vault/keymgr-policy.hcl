# keymgr: least-privilege Vault / OpenBao policy for the vault-transit backend
# and the Vault KV v2 state store.
#
# Written for the defaults; change the three names if your config differs:
#   transit mount   "transit"        ([backends.NAME] mount)
#   key prefix      "keymgr-"        ([backends.NAME] key_prefix)
#   state           "secret" + "keymgr/state"   (daemon.state = "vault://secret/keymgr/state";
#                   its ".lock" and ".lease" records sit beside it)
#
#   bao policy write keymgr deploy/vault/keymgr-policy.hcl
#
# keymgr never exports, backs up, rotates or trims a key, and never reads
# anything outside these paths.

# List the key names of the mount: the orphan check after a crash. Transit
# has no LIST per prefix, so this shows every key *name* in the mount (never
# key material); give keymgr its own mount if other names must stay hidden.
path "transit/keys" {
  capabilities = ["list"]
}

# Create keymgr's keys, read their public halves and flags, allow their
# deletion, and delete them. The parameter constraints mean that even a
# stolen keymgr token cannot create an exportable key, turn on export or
# plaintext backup of an existing one, or trim old versions.
path "transit/keys/keymgr-*" {
  capabilities = ["create", "read", "update", "delete"]
  allowed_parameters = {
    "type"                   = ["ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"]
    "exportable"             = [false]
    "allow_plaintext_backup" = [false]
    "deletion_allowed"       = [true]
  }
}

# Sign with them (one request per token).
path "transit/sign/keymgr-*" {
  capabilities = ["update"]
}

# Never: key export and backups (plaintext key material).
path "transit/export/*" {
  capabilities = ["deny"]
}
path "transit/backup/*" {
  capabilities = ["deny"]
}

# The state document: KV v2 data (read; create/update with check-and-set)
# and metadata (current version, for change detection and the
# "latest version was deleted" check).
path "secret/data/keymgr/state" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/keymgr/state" {
  capabilities = ["read"]
}

# Beside it, two small records also written with check-and-set: the lock a
# reconcile pass holds (so two processes never take each other's fresh keys
# for orphans) and the daemon replicas' lease.
path "secret/data/keymgr/state.lock" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/keymgr/state.lease" {
  capabilities = ["create", "read", "update"]
}

# Immutable documents beside the state, written once with cas=0 (KV v2
# calls every write an update, so "update" is needed even for that): audit
# events (state.audit/000000000123.json) and state shards (content-named).
path "secret/data/keymgr/state.audit/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/keymgr/state.shards/*" {
  capabilities = ["create", "read", "update"]
}

# Garbage collection of those shards: list them (the sweep of shards a commit
# that crashed before its head left behind), and delete an unreferenced one
# for good (its metadata and every version) once its grace has passed.
path "secret/metadata/keymgr/state.shards/*" {
  capabilities = ["list", "delete"]
}
