//! The little protocol between a node's [`crate::transport::SimTransport`] and the
//! simulated broker: length-prefixed frames over turmoil's simulated TCP.
//!
//! One request per connection for publish, stream info and claims; a subscription keeps its
//! connection and receives messages (and heartbeats, so a stalled stream is noticed).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A request to the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Store a message unless its id is in the duplicate window.
    Publish {
        /// `Nats-Msg-Id`.
        id: String,
        /// The message.
        payload: Bytes,
    },
    /// The stream's extent.
    Info,
    /// Deliver every message from `from` on.
    Subscribe {
        /// First sequence.
        from: u64,
    },
    /// Take or renew a lease.
    Lease {
        /// Lease key.
        key: String,
        /// Owner token.
        owner: String,
    },
    /// Renew a lease only from this revision (compare-and-set).
    RenewLease {
        /// Lease key.
        key: String,
        /// Owner token.
        owner: String,
        /// The revision last granted.
        revision: u64,
    },
    /// Give up a lease.
    Release {
        /// Lease key.
        key: String,
        /// Owner token.
        owner: String,
    },
    /// Store an object.
    ObjPut {
        /// Name.
        name: String,
        /// Content.
        data: Bytes,
    },
    /// Read an object.
    ObjGet {
        /// Name.
        name: String,
    },
    /// List object names.
    ObjList,
    /// Delete an object.
    ObjDelete {
        /// Name.
        name: String,
    },
}

/// A response from the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Stored (or dropped as a duplicate of `seq`).
    PubAck {
        /// The message's sequence.
        seq: u64,
        /// It was a duplicate.
        duplicate: bool,
    },
    /// Stream extent.
    Info {
        /// First sequence held (last + 1 when empty).
        first: u64,
        /// Last sequence stored.
        last: u64,
    },
    /// A delivered message.
    Msg {
        /// Sequence.
        seq: u64,
        /// Server time it was stored, ms since the epoch.
        ts_ms: u64,
        /// Messages after it.
        pending: u64,
        /// Bytes.
        payload: Bytes,
    },
    /// Nothing new; the subscription is alive.
    Heartbeat,
    /// Claim granted at server time.
    Claimed {
        /// Server time, ms since the epoch.
        server_ms: u64,
        /// The grant's revision.
        revision: u64,
    },
    /// A renewal from a revision that is no longer the lease's.
    Lost,
    /// Claim held by another owner.
    Held {
        /// The owner.
        by: String,
    },
    /// Done.
    Done,
    /// An object, or none.
    Obj(Option<Bytes>),
    /// Object names.
    Names(Vec<String>),
}

fn put_bytes(b: &mut BytesMut, x: &[u8]) {
    b.put_u32(x.len() as u32);
    b.put_slice(x);
}

fn get_bytes(b: &mut Bytes) -> Option<Bytes> {
    if b.remaining() < 4 {
        return None;
    }
    let n = b.get_u32() as usize;
    (b.remaining() >= n).then(|| b.split_to(n))
}

fn get_u64(b: &mut Bytes) -> Option<u64> {
    (b.remaining() >= 8).then(|| b.get_u64())
}

fn get_string(b: &mut Bytes) -> Option<String> {
    String::from_utf8(get_bytes(b)?.to_vec()).ok()
}

impl Request {
    fn encode(&self) -> BytesMut {
        let mut b = BytesMut::new();
        match self {
            Request::Publish { id, payload } => {
                b.put_u8(1);
                put_bytes(&mut b, id.as_bytes());
                put_bytes(&mut b, payload);
            }
            Request::Info => b.put_u8(2),
            Request::Subscribe { from } => {
                b.put_u8(3);
                b.put_u64(*from);
            }
            Request::Lease { key, owner } => {
                b.put_u8(4);
                put_bytes(&mut b, key.as_bytes());
                put_bytes(&mut b, owner.as_bytes());
            }
            Request::Release { key, owner } => {
                b.put_u8(5);
                put_bytes(&mut b, key.as_bytes());
                put_bytes(&mut b, owner.as_bytes());
            }
            Request::ObjPut { name, data } => {
                b.put_u8(6);
                put_bytes(&mut b, name.as_bytes());
                put_bytes(&mut b, data);
            }
            Request::ObjGet { name } => {
                b.put_u8(7);
                put_bytes(&mut b, name.as_bytes());
            }
            Request::ObjList => b.put_u8(8),
            Request::ObjDelete { name } => {
                b.put_u8(9);
                put_bytes(&mut b, name.as_bytes());
            }
            Request::RenewLease {
                key,
                owner,
                revision,
            } => {
                b.put_u8(10);
                put_bytes(&mut b, key.as_bytes());
                put_bytes(&mut b, owner.as_bytes());
                b.put_u64(*revision);
            }
        }
        b
    }

    fn decode(mut b: Bytes) -> Option<Request> {
        if !b.has_remaining() {
            return None;
        }
        Some(match b.get_u8() {
            1 => Request::Publish {
                id: get_string(&mut b)?,
                payload: get_bytes(&mut b)?,
            },
            2 => Request::Info,
            3 => Request::Subscribe {
                from: get_u64(&mut b)?,
            },
            4 => Request::Lease {
                key: get_string(&mut b)?,
                owner: get_string(&mut b)?,
            },
            5 => Request::Release {
                key: get_string(&mut b)?,
                owner: get_string(&mut b)?,
            },
            6 => Request::ObjPut {
                name: get_string(&mut b)?,
                data: get_bytes(&mut b)?,
            },
            7 => Request::ObjGet {
                name: get_string(&mut b)?,
            },
            8 => Request::ObjList,
            9 => Request::ObjDelete {
                name: get_string(&mut b)?,
            },
            10 => Request::RenewLease {
                key: get_string(&mut b)?,
                owner: get_string(&mut b)?,
                revision: get_u64(&mut b)?,
            },
            _ => return None,
        })
    }
}

impl Response {
    fn encode(&self) -> BytesMut {
        let mut b = BytesMut::new();
        match self {
            Response::PubAck { seq, duplicate } => {
                b.put_u8(1);
                b.put_u64(*seq);
                b.put_u8(u8::from(*duplicate));
            }
            Response::Info { first, last } => {
                b.put_u8(2);
                b.put_u64(*first);
                b.put_u64(*last);
            }
            Response::Msg {
                seq,
                ts_ms,
                pending,
                payload,
            } => {
                b.put_u8(3);
                b.put_u64(*seq);
                b.put_u64(*ts_ms);
                b.put_u64(*pending);
                put_bytes(&mut b, payload);
            }
            Response::Heartbeat => b.put_u8(4),
            Response::Claimed {
                server_ms,
                revision,
            } => {
                b.put_u8(5);
                b.put_u64(*server_ms);
                b.put_u64(*revision);
            }
            Response::Lost => b.put_u8(10),
            Response::Held { by } => {
                b.put_u8(6);
                put_bytes(&mut b, by.as_bytes());
            }
            Response::Done => b.put_u8(7),
            Response::Obj(o) => {
                b.put_u8(8);
                match o {
                    Some(d) => {
                        b.put_u8(1);
                        put_bytes(&mut b, d);
                    }
                    None => b.put_u8(0),
                }
            }
            Response::Names(names) => {
                b.put_u8(9);
                b.put_u32(names.len() as u32);
                for n in names {
                    put_bytes(&mut b, n.as_bytes());
                }
            }
        }
        b
    }

    fn decode(mut b: Bytes) -> Option<Response> {
        if !b.has_remaining() {
            return None;
        }
        Some(match b.get_u8() {
            1 => Response::PubAck {
                seq: get_u64(&mut b)?,
                duplicate: b.has_remaining() && b.get_u8() == 1,
            },
            2 => Response::Info {
                first: get_u64(&mut b)?,
                last: get_u64(&mut b)?,
            },
            3 => Response::Msg {
                seq: get_u64(&mut b)?,
                ts_ms: get_u64(&mut b)?,
                pending: get_u64(&mut b)?,
                payload: get_bytes(&mut b)?,
            },
            4 => Response::Heartbeat,
            5 => Response::Claimed {
                server_ms: get_u64(&mut b)?,
                revision: get_u64(&mut b)?,
            },
            10 => Response::Lost,
            6 => Response::Held {
                by: get_string(&mut b)?,
            },
            7 => Response::Done,
            8 => {
                if b.has_remaining() && b.get_u8() == 1 {
                    Response::Obj(Some(get_bytes(&mut b)?))
                } else {
                    Response::Obj(None)
                }
            }
            9 => {
                if b.remaining() < 4 {
                    return None;
                }
                let n = b.get_u32() as usize;
                let mut names = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    names.push(get_string(&mut b)?);
                }
                Response::Names(names)
            }
            _ => return None,
        })
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: BytesMut) -> std::io::Result<()> {
    let mut frame = BytesMut::with_capacity(body.len() + 4);
    frame.put_u32(body.len() as u32);
    frame.put_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Bytes> {
    let n = r.read_u32().await? as usize;
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await?;
    Ok(Bytes::from(buf))
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// Sends a request.
pub async fn send_request<W: AsyncWrite + Unpin>(w: &mut W, r: &Request) -> std::io::Result<()> {
    write_frame(w, r.encode()).await
}

/// Reads a request.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Request> {
    Request::decode(read_frame(r).await?).ok_or_else(|| bad("bad request"))
}

/// Sends a response.
pub async fn send_response<W: AsyncWrite + Unpin>(w: &mut W, r: &Response) -> std::io::Result<()> {
    write_frame(w, r.encode()).await
}

/// Reads a response.
pub async fn read_response<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Response> {
    Response::decode(read_frame(r).await?).ok_or_else(|| bad("bad response"))
}
