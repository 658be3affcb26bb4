//! Generated protobuf and gRPC code for `sipwarden.v1`: the contract edges and controllers meet on.

/// `sipwarden.v1`: domain messages and the edge-facing service.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sipwarden.v1");
}

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn ban_round_trips_through_the_wire_format() {
        let ban = v1::Ban {
            id: "b1".into(),
            target: Some(v1::BanTarget {
                target: Some(v1::ban_target::Target::Cidr("203.0.113.0/24".into())),
            }),
            reason: "svwar".into(),
            source: v1::BanSource::AutoRule as i32,
            expires_unix_ms: 42,
            ..Default::default()
        };
        let bytes = ban.encode_to_vec();
        assert_eq!(v1::Ban::decode(bytes.as_slice()).unwrap(), ban);
    }
}
