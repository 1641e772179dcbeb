package dev.edgemm.demo

import android.graphics.Bitmap
import java.io.Closeable
import java.io.File

/** Timings of one answer, from the engine's edgemm_stats. */
data class AnswerStats(
    val imageEncodeMs: Double,
    val prefillMs: Double,
    val decodeMs: Double,
    val ttftMs: Double,
    val visualTokens: Int,
    val prefillTokens: Int,
    val decodeTokens: Int,
    val npuLaneBusy: Double,
    val cpuLaneBusy: Double,
    val cancelled: Boolean,
) {
    val prefillTokPerS: Double get() = if (prefillMs > 0) prefillTokens / (prefillMs / 1e3) else 0.0
    val decodeTokPerS: Double get() = if (decodeMs > 0) decodeTokens / (decodeMs / 1e3) else 0.0

    companion object {
        fun of(v: DoubleArray) = AnswerStats(
            imageEncodeMs = v[EdgemmNative.STAT_IMAGE_ENCODE_MS],
            prefillMs = v[EdgemmNative.STAT_PREFILL_MS],
            decodeMs = v[EdgemmNative.STAT_DECODE_MS],
            ttftMs = v[EdgemmNative.STAT_TTFT_MS],
            visualTokens = v[EdgemmNative.STAT_VISUAL_TOKENS].toInt(),
            prefillTokens = v[EdgemmNative.STAT_PREFILL_TOKENS].toInt(),
            decodeTokens = v[EdgemmNative.STAT_DECODE_TOKENS].toInt(),
            npuLaneBusy = v[EdgemmNative.STAT_NPU_LANE_BUSY],
            cpuLaneBusy = v[EdgemmNative.STAT_CPU_LANE_BUSY],
            cancelled = v[EdgemmNative.STAT_CANCELLED] != 0.0,
        )
    }
}

data class GenerateOptions(
    val maxNewTokens: Int = 64,
    val temperature: Float = 0f,
    val topK: Int = 0,
    val topP: Float = 1f,
    val seed: Long = 0,
)

/**
 * A loaded bundle and one session on it. Not thread-safe: the caller runs every call on one thread
 * (MainViewModel uses a single-thread dispatcher). close() frees the session, then the model.
 */
class Engine private constructor(private var model: Long, private var session: Long, val info: String) : Closeable {

    companion object {
        /** Loads a bundle directory (android-cpu / android-npu export) or a model file. */
        fun load(path: File, threads: Int, npuLane: Boolean): Engine {
            val model = EdgemmNative.loadModel(path.absolutePath, threads, npuLane, 0, 0)
            try {
                val info = EdgemmNative.modelInfo(model)
                val session = EdgemmNative.createSession(model)
                return Engine(model, session, info)
            } catch (e: Throwable) {
                EdgemmNative.freeModel(model)
                throw e
            }
        }

        fun version(): String = EdgemmNative.version()
    }

    /** Attaches a picture; the engine resizes it to the model's image size (pad/crop as the model says). */
    fun setImage(bitmap: Bitmap) {
        val bmp = if (bitmap.config == Bitmap.Config.ARGB_8888) bitmap else bitmap.copy(Bitmap.Config.ARGB_8888, false)
        val argb = IntArray(bmp.width * bmp.height)
        bmp.getPixels(argb, 0, bmp.width, 0, 0, bmp.width, bmp.height)
        EdgemmNative.setImageArgb(session, argb, bmp.width, bmp.height)
    }

    fun clearImage() = EdgemmNative.clearImage(session)

    /** Streams the answer through [onPiece] (return false to stop); returns the timings. */
    fun generate(prompt: String, options: GenerateOptions, onPiece: (String) -> Boolean): AnswerStats {
        val stats = EdgemmNative.generate(
            session, prompt, options.maxNewTokens, options.temperature, options.topK, options.topP, options.seed,
            object : TokenListener {
                override fun onToken(piece: String, tokenId: Int): Boolean = onPiece(piece)
            }
        )
        return AnswerStats.of(stats)
    }

    override fun close() {
        if (session != 0L) EdgemmNative.freeSession(session)
        if (model != 0L) EdgemmNative.freeModel(model)
        session = 0L
        model = 0L
    }
}
