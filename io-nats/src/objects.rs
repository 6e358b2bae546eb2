//! Snapshots in a JetStream object store bucket (the default snapshot store).

use async_nats::jetstream::{self, object_store};
use bytes::Bytes;
use futures::StreamExt;
use marmot_core::snapshot::{ObjectStore, Progress};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A JetStream object store bucket holding snapshots.
pub struct NatsObjectStore {
    store: object_store::ObjectStore,
}

impl NatsObjectStore {
    /// Opens (creating if needed) the bucket `bucket` with `replicas` replicas.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, String> {
        let store = match js.get_object_store(bucket).await {
            Ok(s) => s,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: bucket.to_string(),
                    description: Some("marmot snapshots".into()),
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("creating object store bucket {bucket}: {e}"))?,
        };
        Ok(NatsObjectStore { store })
    }
}

/// Reports bytes read so far.
struct Counting<'a, R> {
    inner: R,
    done: u64,
    progress: Progress<'a>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<'_, R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.done += n;
            (self.progress)(self.done);
        }
        r
    }
}

async fn copy_out<W: AsyncWrite + Unpin>(
    mut from: object_store::Object,
    to: &mut W,
    progress: Progress<'_>,
) -> std::io::Result<u64> {
    let mut counting = Counting {
        inner: &mut from,
        done: 0,
        progress,
    };
    tokio::io::copy(&mut counting, to).await
}

#[async_trait::async_trait]
impl ObjectStore for NatsObjectStore {
    async fn put_file(
        &self,
        name: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<(), String> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut reader = Counting {
            inner: tokio::io::BufReader::with_capacity(1 << 20, file),
            done: 0,
            progress,
        };
        let meta = object_store::ObjectMetadata {
            name: name.to_string(),
            chunk_size: Some(512 * 1024),
            ..Default::default()
        };
        self.store
            .put(meta, &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| format!("uploading {name}: {e}"))
    }

    async fn get_file(
        &self,
        name: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<(), String> {
        let object = self
            .store
            .get(name)
            .await
            .map_err(|e| format!("downloading {name}: {e}"))?;
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        copy_out(object, &mut file, progress)
            .await
            .map_err(|e| format!("downloading {name}: {e}"))?;
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|e| e.to_string())
    }

    async fn put_bytes(&self, name: &str, data: Bytes) -> Result<(), String> {
        self.store
            .put(name, &mut &data[..])
            .await
            .map(|_| ())
            .map_err(|e| format!("uploading {name}: {e}"))
    }

    async fn get_bytes(&self, name: &str) -> Result<Option<Bytes>, String> {
        match self.store.get(name).await {
            Ok(mut o) => {
                let mut v = Vec::new();
                o.read_to_end(&mut v)
                    .await
                    .map_err(|e| format!("downloading {name}: {e}"))?;
                Ok(Some(Bytes::from(v)))
            }
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("downloading {name}: {e}")),
        }
    }

    async fn list(&self) -> Result<Vec<String>, String> {
        let mut list = self
            .store
            .list()
            .await
            .map_err(|e| format!("listing snapshots: {e}"))?;
        let mut names = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| format!("listing snapshots: {e}"))?;
            if !info.deleted {
                names.push(info.name);
            }
        }
        Ok(names)
    }

    async fn delete(&self, name: &str) -> Result<(), String> {
        match self.store.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("deleting {name}: {e}")),
        }
    }
}
