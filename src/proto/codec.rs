//! The codec the generated services use: tonic-prost's, except that a
//! message that does not decode is `INVALID_ARGUMENT`. tonic-prost answers
//! `INTERNAL`, which tells an operator the server is broken when it is the
//! caller who sent bytes that are not the message.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// `application/grpc+proto` through prost; named by build.rs's `codec_path`.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = InvalidArgument<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgument(ProstDecoder::default())
    }
}

/// tonic-prost's decoder, whose only error is a message that does not
/// decode, with that error as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct InvalidArgument<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for InvalidArgument<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0
            .decode(buf)
            .map_err(|status| does_not_decode(status.message()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The answer to a request message that does not decode (`detail`: prost's
/// error), on every path that decodes one.
pub fn does_not_decode(detail: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("the message does not decode as protobuf: {detail}"))
}
