//! Arbitrary bytes on a stream, split anywhere, fed to the frame decoder as every message type a
//! peer may send: no panic, no unbounded buffering, and a message that decodes re-encodes to the
//! same frame.

#![no_main]

use fleetrun_proto::{
    ControlDown, ControlUp, EnrollReply, EnrollRequest, FrameDecoder, Hello, HelloReply, TaskDown,
    TaskUp, encode_frame,
};
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};

fn drain<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(dec: &mut FrameDecoder) {
    for _ in 0..16 {
        match dec.decode::<T>() {
            Ok(Some(msg)) => {
                let frame = encode_frame(&msg).expect("a decoded message re-encodes");
                let mut again = FrameDecoder::new();
                again.extend(&frame);
                assert_eq!(again.decode::<T>().expect("its frame decodes"), Some(msg));
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    // Feeds the bytes in pieces of a size the first byte chooses, decoding after each.
    let piece = usize::from(selector >> 3).max(1);
    let mut dec = FrameDecoder::new();
    for chunk in rest.chunks(piece) {
        dec.extend(chunk);
        match selector % 8 {
            0 => drain::<TaskUp>(&mut dec),
            1 => drain::<TaskDown>(&mut dec),
            2 => drain::<Hello>(&mut dec),
            3 => drain::<HelloReply>(&mut dec),
            4 => drain::<ControlDown>(&mut dec),
            5 => drain::<EnrollRequest>(&mut dec),
            6 => drain::<EnrollReply>(&mut dec),
            _ => drain::<ControlUp>(&mut dec),
        }
    }
    let _ = dec.finish();
});
