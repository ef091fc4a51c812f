//! Where the collector keeps bundles: an `object_store`, each bundle under
//! `bundles/sha256/<hex digest of its bytes>`.
//!
//! A name that is the digest of the content makes every write idempotent (writing a bundle
//! twice writes the same bytes under the same name) and lets the collectors of a fleet share
//! one bucket. `store` in the collector's config is a local directory (created if missing)
//! or a URL `object_store` parses: `s3://bucket/prefix` (credentials, region and endpoint
//! from the `AWS_*` environment variables, as `object_store`'s `AmazonS3Builder` reads them:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for
//! S3-compatible storage, `AWS_ALLOW_HTTP`), also `file:///dir` and `memory://`.
//! The local store writes each object to a temporary file and renames it into place.

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, path::Path as ObjectPath};

pub struct Store {
    inner: Box<dyn ObjectStore>,
    prefix: ObjectPath,
    /// For logs and errors.
    pub location: String,
}

impl Store {
    /// The store `spec` names (see the module docs).
    pub fn open(spec: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(!spec.is_empty(), "[collector] store is empty: give a directory or an s3:// URL");
        if !spec.contains("://") {
            let dir = std::path::Path::new(spec);
            std::fs::create_dir_all(dir).map_err(|e| {
                anyhow::anyhow!("cannot create the store directory {spec}: {e}; give a writable [collector] store")
            })?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| anyhow::anyhow!("cannot use {spec} as the store: {e}"))?;
            return Ok(Self { inner: Box::new(fs), prefix: ObjectPath::from("bundles"), location: spec.to_owned() });
        }
        let url = url::Url::parse(spec).map_err(|e| {
            anyhow::anyhow!("[collector] store = {spec:?} is not a URL ({e}): give a directory or s3://bucket/prefix")
        })?;
        // object_store's option names are the environment's, lower-cased (aws_region, ...).
        let options = std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).map(|(k, v)| (k.to_ascii_lowercase(), v));
        let (inner, path) = object_store::parse_url_opts(&url, options)
            .map_err(|e| anyhow::anyhow!("[collector] store = {spec:?}: {e}"))?;
        Ok(Self { inner, prefix: path.clone().join("bundles"), location: spec.to_owned() })
    }

    fn path(&self, digest: &str) -> ObjectPath {
        self.prefix.clone().join("sha256").join(digest)
    }

    /// Write the bundle named `digest` (its bytes' hex SHA-256, checked by the caller).
    pub async fn put(&self, digest: &str, bytes: Bytes) -> anyhow::Result<()> {
        self.inner
            .put(&self.path(digest), PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| anyhow::anyhow!("cannot write bundle {digest} to {}: {e}", self.location))?;
        Ok(())
    }

    /// The bundle named `digest`; None when the store has none.
    pub async fn get(&self, digest: &str) -> anyhow::Result<Option<Bytes>> {
        match self.inner.get(&self.path(digest)).await {
            Ok(got) => Ok(Some(
                got.bytes()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot read bundle {digest} from {}: {e}", self.location))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow::anyhow!("cannot read bundle {digest} from {}: {e}", self.location)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testutil::TempDir;

    #[tokio::test]
    async fn a_directory_store_keeps_bundles_by_digest() {
        let dir = TempDir::new("store");
        let root = dir.path().join("store");
        let store = Store::open(root.to_str().unwrap()).unwrap();
        let digest = "ab".repeat(32);
        assert_eq!(store.get(&digest).await.unwrap(), None);
        store.put(&digest, Bytes::from_static(b"bundle")).await.unwrap();
        store.put(&digest, Bytes::from_static(b"bundle")).await.unwrap();
        assert_eq!(store.get(&digest).await.unwrap().as_deref(), Some(&b"bundle"[..]));
        assert_eq!(std::fs::read(root.join("bundles/sha256").join(&digest)).unwrap(), b"bundle");
        assert_eq!(std::fs::read_dir(root.join("bundles/sha256")).unwrap().count(), 1, "one file, no leftovers");
        let memory = Store::open("memory://").unwrap();
        memory.put(&digest, Bytes::from_static(b"x")).await.unwrap();
        assert!(Store::open("nope://bucket").is_err());
    }
}
