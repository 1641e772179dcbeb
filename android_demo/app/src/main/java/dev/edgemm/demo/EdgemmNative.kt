package dev.edgemm.demo

/**
 * The JNI surface of the demo: one `external fun` per entry point of app/src/main/cpp/edgemm_jni.cpp,
 * which calls the engine's C ABI (native/include/edgemm.h) and nothing else.
 *
 * Keep this list, the .cpp symbols and the host harness (android_demo/host_test/.../EdgemmNative.java) in
 * step: tests/test_android_bridge.py fails when the three differ in names or types.
 *
 * Handles are Longs (0 = none). Failures throw [EdgemmException] (engine status + message); a 0 handle
 * throws IllegalStateException. Use [Engine] rather than these raw calls.
 */
object EdgemmNative {
    init {
        System.loadLibrary("edgemm") // the engine (libedgemm.so, CMake target edgemm_shared)
        System.loadLibrary("edgemm_jni")
    }

    // Indices into the DoubleArray returned by generate().
    const val STAT_IMAGE_ENCODE_MS = 0
    const val STAT_PREFILL_MS = 1
    const val STAT_DECODE_MS = 2
    const val STAT_TTFT_MS = 3
    const val STAT_VISUAL_TOKENS = 4
    const val STAT_PREFILL_TOKENS = 5
    const val STAT_DECODE_TOKENS = 6
    const val STAT_NPU_LANE_BUSY = 7
    const val STAT_CPU_LANE_BUSY = 8
    const val STAT_CANCELLED = 9

    @JvmStatic external fun abiVersion(): Int

    @JvmStatic external fun version(): String

    /** path: a bundle directory (manifest.json) or a model file; 0 for nThreads/chunkSize/maxContext = defaults. */
    @JvmStatic external fun loadModel(path: String, nThreads: Int, npuLane: Boolean, chunkSize: Int, maxContext: Int): Long

    @JvmStatic external fun freeModel(model: Long)

    /** JSON describing the loaded model (edgemm_model_info_json). */
    @JvmStatic external fun modelInfo(model: Long): String

    @JvmStatic external fun createSession(model: Long): Long

    @JvmStatic external fun freeSession(session: Long)

    /** argb: width*height pixels 0xAARRGGBB, row-major (Bitmap.getPixels); the engine resizes and normalizes. */
    @JvmStatic external fun setImageArgb(session: Long, argb: IntArray, width: Int, height: Int)

    @JvmStatic external fun clearImage(session: Long)

    /**
     * Answers [prompt] about the session's image (if any), calling [listener] for every token on the calling
     * thread. Returns the stats (indices STAT_*); STAT_CANCELLED is 1.0 when the listener stopped it.
     */
    @JvmStatic external fun generate(
        session: Long,
        prompt: String,
        maxNewTokens: Int,
        temperature: Float,
        topK: Int,
        topP: Float,
        seed: Long,
        listener: TokenListener
    ): DoubleArray
}

/** Receives each generated token's text (on the thread that called generate); return false to stop the answer. */
interface TokenListener {
    fun onToken(piece: String, tokenId: Int): Boolean
}

/** A failed engine call: [status] is the edgemm_status code (EDGEMM_ERR_*), the message the engine's. */
class EdgemmException(val status: Int, message: String) : Exception(message)
