//! The bound on a gRPC request message, enforced from each message's 5-byte
//! prefix as the bytes arrive: a longer message is `RESOURCE_EXHAUSTED`
//! naming the bound, and none of it is buffered. tonic's own
//! `max_decoding_message_size` answers `OUT_OF_RANGE`, which says a value
//! lies outside its valid range, not that the request is too large; it stays
//! set to the same bound, for messages that grow when decompressed.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http_body::{Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::{http, Bytes, Service};
use tonic::server::NamedService;
use tonic::Status;

/// A generated service whose request messages may be at most `max` bytes.
#[derive(Clone, Debug)]
pub struct Bounded<S> {
    inner: S,
    max: usize,
}

impl<S> Bounded<S> {
    pub fn new(inner: S, max: usize) -> Bounded<S> {
        Bounded { inner, max }
    }
}

impl<S: NamedService> NamedService for Bounded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Bounded<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> S::Future {
        let max = self.max;
        self.inner.call(request.map(|inner| {
            Body::new(BoundedBody {
                inner,
                max,
                prefixes: Prefixes::default(),
            })
        }))
    }
}

struct BoundedBody {
    inner: Body,
    max: usize,
    prefixes: Prefixes,
}

impl http_body::Body for BoundedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            if let Err(len) = this.prefixes.read(data, this.max) {
                return Poll::Ready(Some(Err(over_the_bound(len, this.max))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The answer to a request message of `len` bytes, over the bound `max`.
pub(super) fn over_the_bound(len: usize, max: usize) -> Status {
    Status::resource_exhausted(format!(
        "request message of {len} bytes is over the bound of {max} bytes"
    ))
}

/// Where a reader is in a stream of gRPC messages, each a compression flag
/// byte, a big-endian u32 length, and that many bytes.
#[derive(Debug, Default)]
pub(super) struct Prefixes {
    prefix: [u8; 5],
    /// Bytes of `prefix` read so far.
    have: usize,
    /// Bytes of the current message still to come.
    skip: usize,
}

impl Prefixes {
    /// Reads the next bytes of the stream; `Err` with the length of a
    /// message longer than `max`.
    pub(super) fn read(&mut self, mut data: &[u8], max: usize) -> Result<(), usize> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (self.prefix.len() - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == self.prefix.len() {
                let [_, a, b, c, d] = self.prefix;
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                if len > max {
                    return Err(len);
                }
                self.have = 0;
                self.skip = len;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&len.to_be_bytes());
        m.resize(5 + len as usize, 7);
        m
    }

    #[test]
    fn messages_up_to_the_bound_pass_in_any_split() {
        let mut stream = message(10);
        stream.extend(message(0));
        stream.extend(message(3));
        for chunk in 1..stream.len() {
            let mut p = Prefixes::default();
            for part in stream.chunks(chunk) {
                assert_eq!(p.read(part, 10), Ok(()), "chunks of {chunk}");
            }
            assert_eq!((p.have, p.skip), (0, 0));
        }
    }

    #[test]
    fn a_longer_message_is_refused_from_its_prefix() {
        let mut stream = message(2);
        stream.extend_from_slice(&[0, 0, 0, 0, 11]);
        for chunk in 1..stream.len() {
            let mut p = Prefixes::default();
            let refused = stream
                .chunks(chunk)
                .map(|part| p.read(part, 10))
                .find(Result::is_err);
            assert_eq!(refused, Some(Err(11)), "chunks of {chunk}");
        }
        let mut p = Prefixes::default();
        assert_eq!(
            p.read(&[1, 0xff, 0xff, 0xff, 0xff], 10),
            Err(u32::MAX as usize)
        );
    }
}
