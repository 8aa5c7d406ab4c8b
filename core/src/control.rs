//! The control stream's protobuf API (`proto/lumen/control/v1`): how
//! `lumen-control` streams versioned snapshots of the mesh's resources to
//! proxies and takes their acknowledgements, and how `lumen apply / delete /
//! get / proxy-status` talk to it. Resources travel in Kubernetes form with
//! their spec as JSON, and are validated on arrival as files are.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("lumen.control.v1");
}

use crate::resource::{ConfigError, Kind, Resource, ResourceKey};

/// Protobuf over gRPC as `tonic_prost::ProstCodec`, with smaller buffers.
/// tonic's encoder gathers ready messages up to 32 KiB before writing and
/// then keeps a buffer that large for the life of the stream; a control
/// plane holds a stream per proxy, so that was 64 KiB per proxy held
/// forever after the first large view. Here a stream writes each snapshot
/// part (about 4 KiB) as it comes, within an 8 KiB buffer.
#[derive(Debug)]
pub struct ControlCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for ControlCodec<T, U> {
    fn default() -> Self {
        ControlCodec(std::marker::PhantomData)
    }
}

const CODEC_BUFFER: usize = 8 * 1024;
const CODEC_YIELD: usize = 4 * 1024;

impl<T, U> tonic::codec::Codec for ControlCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(CODEC_BUFFER, CODEC_YIELD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::new(CODEC_BUFFER, CODEC_YIELD))
    }
}

/// Default address of the control plane's gRPC port.
pub const DEFAULT_ADDR: &str = "127.0.0.1:15010";

impl From<&Resource> for v1::Resource {
    fn from(r: &Resource) -> Self {
        v1::Resource {
            api_version: r.api_version.clone(),
            kind: r.kind.as_str().to_string(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            spec_json: r.spec.to_string(),
            origin: r.origin.clone(),
            labels: r.labels.clone().into_iter().collect(),
        }
    }
}

impl TryFrom<&v1::Resource> for Resource {
    type Error = ConfigError;

    fn try_from(r: &v1::Resource) -> Result<Self, ConfigError> {
        let err = |field: &str, reason: String| ConfigError {
            file: r.origin.clone(),
            resource: format!("{} {}/{}", r.kind, r.namespace, r.name),
            field: field.to_string(),
            reason,
        };
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == r.kind)
            .ok_or_else(|| err("kind", format!("unknown kind `{}`", r.kind)))?;
        let spec = serde_json::from_str(&r.spec_json)
            .map_err(|e| err("spec", format!("not JSON: {e}")))?;
        Ok(Resource {
            api_version: r.api_version.clone(),
            kind,
            name: r.name.clone(),
            namespace: r.namespace.clone(),
            labels: r.labels.clone().into_iter().collect(),
            spec,
            origin: r.origin.clone(),
            prefix: String::new(),
        })
    }
}

impl From<&ResourceKey> for v1::ResourceKey {
    fn from(k: &ResourceKey) -> Self {
        v1::ResourceKey {
            kind: k.kind.as_str().to_string(),
            namespace: k.namespace.clone(),
            name: k.name.clone(),
        }
    }
}

impl TryFrom<&v1::ResourceKey> for ResourceKey {
    type Error = String;

    fn try_from(k: &v1::ResourceKey) -> Result<Self, String> {
        Ok(ResourceKey {
            kind: Kind::parse(&k.kind).ok_or_else(|| format!("unknown kind `{}`", k.kind))?,
            namespace: k.namespace.clone(),
            name: k.name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::parse_resources;

    #[test]
    fn resources_round_trip_through_the_wire_form() {
        let rs = parse_resources(
            "vs.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\n  namespace: prod\nspec:\n  hosts: [r]\n",
        )
        .unwrap();
        let wire = v1::Resource::from(&rs[0]);
        let back = Resource::try_from(&wire).unwrap();
        assert_eq!(back, rs[0]);
    }
}
