package dev.edgemm.demo

import android.app.Application
import android.graphics.Bitmap
import android.graphics.ImageDecoder
import android.net.Uri
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.asCoroutineDispatcher
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch
import java.io.File
import java.util.concurrent.Executors

data class UiState(
    val bundles: List<File> = emptyList(),
    val bundle: File? = null,
    val threads: Int = 4,
    val npuLane: Boolean = true, // the two-lane W8A8 prefill: much faster on W8A8 bundles (docs/apps.md)
    val loading: Boolean = false,
    val engineInfo: String? = null,
    val image: Bitmap? = null,
    val question: String = "",
    val answer: String = "",
    val running: Boolean = false,
    val stats: AnswerStats? = null,
    val error: String? = null,
)

/**
 * Owns the engine. Every engine call runs on one background thread (a session is single-threaded);
 * tokens stream into [state] as they arrive, and [stop] makes the token listener return false.
 */
class MainViewModel(app: Application) : AndroidViewModel(app) {
    private val engineThread = Executors.newSingleThreadExecutor { r -> Thread(r, "edgemm-engine") }.asCoroutineDispatcher()
    private var engine: Engine? = null
    private var imageSent: Bitmap? = null

    @Volatile private var stopRequested = false

    private val _state = MutableStateFlow(UiState())
    val state: StateFlow<UiState> = _state

    /** Where `adb push` puts bundles: /sdcard/Android/data/dev.edgemm.demo/files/bundles/<name>/manifest.json */
    val bundlesDir: File = File(app.getExternalFilesDir(null), "bundles")

    init {
        refreshBundles()
    }

    fun refreshBundles() {
        val found = bundlesDir.listFiles()?.filter { File(it, "manifest.json").isFile }?.sortedBy { it.name } ?: emptyList()
        _state.update { it.copy(bundles = found, bundle = it.bundle ?: found.firstOrNull()) }
    }

    fun selectBundle(f: File) = _state.update { it.copy(bundle = f) }
    fun setThreads(n: Int) = _state.update { it.copy(threads = n.coerceIn(1, 8)) }
    fun setNpuLane(on: Boolean) = _state.update { it.copy(npuLane = on) }
    fun setQuestion(q: String) = _state.update { it.copy(question = q) }
    fun setImage(bmp: Bitmap?) = _state.update { it.copy(image = bmp) }

    fun loadBundle() {
        val s = _state.value
        val bundle = s.bundle ?: return
        _state.update { it.copy(loading = true, error = null, engineInfo = null) }
        viewModelScope.launch(engineThread) {
            try {
                engine?.close()
                engine = null
                imageSent = null
                val e = Engine.load(bundle, s.threads, s.npuLane)
                engine = e
                _state.update { it.copy(loading = false, engineInfo = "${bundle.name} · engine ${Engine.version()}") }
            } catch (e: Exception) {
                _state.update { it.copy(loading = false, error = e.message ?: e.toString()) }
            }
        }
    }

    /** Decodes a gallery picture in the background (EXIF rotation applied, at most ~1024 px a side). */
    fun loadImage(uri: Uri) {
        viewModelScope.launch(Dispatchers.IO) {
            try {
                val src = ImageDecoder.createSource(getApplication<Application>().contentResolver, uri)
                val bmp = ImageDecoder.decodeBitmap(src) { decoder, info, _ ->
                    decoder.allocator = ImageDecoder.ALLOCATOR_SOFTWARE // getPixels needs a software bitmap
                    val side = maxOf(info.size.width, info.size.height)
                    var sample = 1
                    while (side / (sample * 2) >= 1024) sample *= 2
                    decoder.setTargetSampleSize(sample)
                }
                _state.update { it.copy(image = bmp, error = null) }
            } catch (e: Exception) {
                _state.update { it.copy(error = "cannot read the picture: ${e.message}") }
            }
        }
    }

    fun ask() {
        val s = _state.value
        val e = engine
        if (e == null) {
            _state.update { it.copy(error = "load a bundle first") }
            return
        }
        if (s.question.isBlank() || s.running) return
        stopRequested = false
        _state.update { it.copy(running = true, answer = "", stats = null, error = null) }
        viewModelScope.launch(engineThread) {
            try {
                if (s.image !== imageSent) { // the engine re-encodes only when the picture changes
                    if (s.image != null) e.setImage(s.image) else e.clearImage()
                    imageSent = s.image
                }
                var first = true
                val stats = e.generate(s.question.trim(), GenerateOptions()) { piece ->
                    val text = if (first) piece.trimStart() else piece // the answer follows "ASSISTANT:"
                    if (text.isNotEmpty()) first = false
                    _state.update { it.copy(answer = it.answer + text) }
                    !stopRequested
                }
                _state.update { it.copy(running = false, stats = stats) }
            } catch (ex: Exception) {
                _state.update { it.copy(running = false, error = ex.message ?: ex.toString()) }
            }
        }
    }

    fun stop() {
        stopRequested = true
    }

    override fun onCleared() {
        stopRequested = true
        engineThread.executor.execute { engine?.close(); engine = null }
        engineThread.close() // runs the queued close first (shutdown, not shutdownNow)
        super.onCleared()
    }
}
