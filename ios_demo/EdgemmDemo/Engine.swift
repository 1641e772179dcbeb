// The iOS demo's only contact with the engine: Swift over the C ABI (native/include/edgemm.h), imported as
// the CEdgemm module (ios_demo/CEdgemm/module.modulemap, packaged in Edgemm.xcframework by
// ios_demo/build_engine.sh).
//
// Every edgemm_* call of the app is in this file. ios_demo/host_test/main.c makes the same calls in the same
// order (its comment maps each one to the Swift call site here); tests/test_ios_bridge.py builds and runs it
// on a real bundle and checks that the two sequences of edgemm_* calls are equal. Keep them in step.

import CEdgemm
import CoreGraphics
import Foundation

/// A failed engine call: the edgemm_status code, its name and the engine's one-line message.
struct EdgemmError: Error, CustomStringConvertible {
    let status: Int32
    let name: String
    let message: String
    var description: String { "\(name): \(message)" }
}

/// Timings of one answer (edgemm_stats).
struct AnswerStats {
    var imageEncodeMs = 0.0, prefillMs = 0.0, decodeMs = 0.0, ttftMs = 0.0
    var visualTokens = 0, prefillTokens = 0, decodeTokens = 0
    var npuLaneBusy = 0.0, cpuLaneBusy = 0.0
    var cancelled = false
    var prefillTokPerS: Double { prefillMs > 0 ? Double(prefillTokens) / (prefillMs / 1e3) : 0 }
    var decodeTokPerS: Double { decodeMs > 0 ? Double(decodeTokens) / (decodeMs / 1e3) : 0 }
}

struct GenerateSettings {
    var maxNewTokens: Int32 = 64
    var temperature: Float = 0
    var topK: Int32 = 0
    var topP: Float = 1
    var seed: UInt64 = 0
}

/// Receives the pieces of one answer; `stop()` (from any thread) ends it after the current token.
final class TokenSink: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false
    let onPiece: (String) -> Void

    init(onPiece: @escaping (String) -> Void) { self.onPiece = onPiece }

    func stop() { lock.lock(); stopped = true; lock.unlock() }
    var isStopped: Bool { lock.lock(); defer { lock.unlock() }; return stopped }
}

/// A loaded bundle and one session. Not thread-safe: EngineHost calls it from one serial queue.
final class Engine {
    private var model: OpaquePointer?
    private var session: OpaquePointer?
    let info: String

    // Call site 1 (host_test/main.c: report_version)
    static func version() -> (abi: Int32, version: String) {
        (edgemm_abi_version(), String(cString: edgemm_version()))
    }

    // Call site 2 (main.c: engine_open): load the bundle directory, read its description, open a session.
    init(bundlePath: String, threads: Int32, npuLane: Bool) throws {
        var opts = edgemm_load_options()
        edgemm_load_options_init(&opts)
        opts.n_threads = threads
        opts.npu_lane = npuLane ? 1 : 0
        var m: OpaquePointer?
        try Engine.check(edgemm_model_load(bundlePath, &opts, &m))
        var needed = 0
        _ = edgemm_model_info_json(m, nil, 0, &needed) // size query: fails with the size in `needed`
        let cap = max(needed, 1)
        var buf = [CChar](repeating: 0, count: cap)
        let st = edgemm_model_info_json(m, &buf, cap, &needed)
        if st != EDGEMM_OK {
            let e = Engine.error(st)
            edgemm_model_free(m)
            throw e
        }
        var s: OpaquePointer?
        let st2 = edgemm_session_create(m, &s)
        if st2 != EDGEMM_OK {
            let e = Engine.error(st2)
            edgemm_model_free(m)
            throw e
        }
        model = m
        session = s
        info = buf.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    // Call site 3 (main.c: engine_set_image): RGB bytes, rows of 3 * width; the engine resizes and normalizes.
    func setImage(_ image: CGImage) throws {
        let (rgb, w, h) = Engine.rgb8(image)
        try rgb.withUnsafeBufferPointer { p in
            try Engine.check(edgemm_session_set_image_rgb8(session, p.baseAddress, Int32(w), Int32(h), Int32(3 * w)))
        }
    }

    // Call site 4 (main.c: engine_clear_image)
    func clearImage() throws {
        try Engine.check(edgemm_session_clear_image(session))
    }

    // Call site 5 (main.c: engine_generate): streams pieces into `sink`; returns the timings.
    func generate(_ prompt: String, settings: GenerateSettings, sink: TokenSink) throws -> AnswerStats {
        var opts = edgemm_generate_options()
        edgemm_generate_options_init(&opts)
        opts.max_new_tokens = settings.maxNewTokens
        opts.temperature = settings.temperature
        opts.top_k = settings.topK
        opts.top_p = settings.topP
        opts.seed = settings.seed
        var st = edgemm_stats()
        st.struct_size = UInt32(MemoryLayout<edgemm_stats>.size)
        let user = Unmanaged.passUnretained(sink).toOpaque()
        let status = edgemm_generate(session, prompt, &opts, { piece, _, user in
            let sink = Unmanaged<TokenSink>.fromOpaque(user!).takeUnretainedValue()
            sink.onPiece(piece.map { String(cString: $0) } ?? "")
            return sink.isStopped ? 1 : 0
        }, user, &st)
        if status != EDGEMM_OK && status != EDGEMM_ERR_CANCELLED {
            throw Engine.error(status)
        }
        return AnswerStats(imageEncodeMs: st.image_encode_ms, prefillMs: st.prefill_ms, decodeMs: st.decode_ms,
                           ttftMs: st.ttft_ms, visualTokens: Int(st.visual_tokens), prefillTokens: Int(st.prefill_tokens),
                           decodeTokens: Int(st.decode_tokens), npuLaneBusy: st.npu_lane_busy,
                           cpuLaneBusy: st.cpu_lane_busy, cancelled: status == EDGEMM_ERR_CANCELLED)
    }

    // Call site 6 (main.c: engine_close): the session before the model.
    deinit {
        edgemm_session_free(session)
        edgemm_model_free(model)
    }

    // Call site 7 (main.c: status_error): read right after the failed call, on the same thread.
    private static func error(_ st: edgemm_status) -> EdgemmError {
        EdgemmError(status: Int32(st.rawValue), name: String(cString: edgemm_status_name(st)),
                    message: String(cString: edgemm_last_error()))
    }

    private static func check(_ st: edgemm_status) throws {
        if st != EDGEMM_OK { throw error(st) }
    }

    /// CGImage -> packed RGB8 (sRGB, alpha dropped), at most 1024 px a side (the engine resizes further).
    static func rgb8(_ image: CGImage) -> ([UInt8], Int, Int) {
        let scale = min(1.0, 1024.0 / Double(max(image.width, image.height)))
        let w = max(1, Int((Double(image.width) * scale).rounded()))
        let h = max(1, Int((Double(image.height) * scale).rounded()))
        var rgba = [UInt8](repeating: 0, count: w * h * 4)
        rgba.withUnsafeMutableBytes { p in
            let ctx = CGContext(data: p.baseAddress, width: w, height: h, bitsPerComponent: 8, bytesPerRow: 4 * w,
                                space: CGColorSpace(name: CGColorSpace.sRGB)!,
                                bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue)!
            ctx.interpolationQuality = .high
            ctx.draw(image, in: CGRect(x: 0, y: 0, width: w, height: h))
        }
        var rgb = [UInt8](repeating: 0, count: w * h * 3)
        for i in 0..<(w * h) {
            rgb[3 * i] = rgba[4 * i]
            rgb[3 * i + 1] = rgba[4 * i + 1]
            rgb[3 * i + 2] = rgba[4 * i + 2]
        }
        return (rgb, w, h)
    }
}
