//! Redis Cluster key slots: CRC16 (XMODEM) of the key's hash tag, mod 16384.

use crate::limiter::CounterKey;

pub const SLOTS: usize = 16_384;

/// CRC16-CCITT (XMODEM), as the Cluster specification defines it (the
/// `crc` crate's, by table; the bit-by-bit loop it replaced, as compiled,
/// cost the same: some 380 instructions for a counter's 32-digit tag).
const XMODEM: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

pub fn crc16(bytes: &[u8]) -> u16 {
    XMODEM.checksum(bytes)
}

/// The slot of any key, honouring a `{hash tag}`.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % SLOTS as u16
}

/// The slot of a counter: its hash tag is the hex of the key hash, so the
/// slot is computed without building the key.
pub fn counter_slot(key: &CounterKey) -> u16 {
    crc16(&key.hash_hex()) % SLOTS as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Algorithm, Entry, KeyHasher};
    use crate::storage::redis::scripts::KEY_PREFIX;

    #[test]
    fn matches_the_cluster_specification() {
        // The specification's test vector, and slots redis-cli reports.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
    }

    #[test]
    fn the_table_agrees_with_the_specification_s_bitwise_loop() {
        let bitwise = |bytes: &[u8]| {
            let mut crc: u16 = 0;
            for &b in bytes {
                crc ^= u16::from(b) << 8;
                for _ in 0..8 {
                    crc = if crc & 0x8000 != 0 {
                        (crc << 1) ^ 0x1021
                    } else {
                        crc << 1
                    };
                }
            }
            crc
        };
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for len in 0..bytes.len() {
            let from = len % 7;
            assert_eq!(
                crc16(&bytes[from..len.max(from)]),
                bitwise(&bytes[from..len.max(from)])
            );
        }
    }

    #[test]
    fn a_counter_slot_is_its_key_slot() {
        let h = KeyHasher::from_secret(b"s");
        for v in ["a", "b", "203.0.113.9"] {
            let key = h.counter_key(
                "d",
                &[Entry {
                    key: "ip",
                    value: v,
                }],
                &[],
                Algorithm::Gcra,
                60,
            );
            assert_eq!(
                counter_slot(&key),
                key_slot(key.redis_key(KEY_PREFIX).as_bytes())
            );
        }
    }
}
