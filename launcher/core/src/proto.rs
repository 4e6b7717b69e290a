//! Generated control-plane types and the job-token check every call goes through.

#![allow(missing_docs, clippy::all)]

tonic::include_proto!("rtrain.v1");

pub use crate::peer_list::{EncodedPeers, RegisterReply};

/// Metadata key that carries the job token on every RPC.
pub const TOKEN_HEADER: &str = "x-rtrain-token";

/// Adds the job token to each outgoing request.
#[derive(Clone)]
pub struct TokenInterceptor {
    token: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl TokenInterceptor {
    pub fn new(token: &str) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        Ok(Self { token: token.parse()? })
    }
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(TOKEN_HEADER, self.token.clone());
        Ok(req)
    }
}
