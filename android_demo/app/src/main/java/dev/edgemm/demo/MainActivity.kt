package dev.edgemm.demo

import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.rememberLauncherForActivityResult
import androidx.activity.compose.setContent
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.activity.viewModels
import androidx.compose.foundation.Image
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.height
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.layout.size
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.verticalScroll
import androidx.compose.material3.Button
import androidx.compose.material3.DropdownMenu
import androidx.compose.material3.DropdownMenuItem
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Surface
import androidx.compose.material3.Switch
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.runtime.collectAsState
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.graphics.asImageBitmap
import androidx.compose.ui.layout.ContentScale
import androidx.compose.ui.text.font.FontFamily
import androidx.compose.ui.unit.dp

/** One screen: bundle, picture (gallery or camera), question, streamed answer, timings. */
class MainActivity : ComponentActivity() {
    private val vm: MainViewModel by viewModels()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContent {
            MaterialTheme {
                Surface(Modifier.fillMaxSize()) { DemoScreen(vm) }
            }
        }
    }
}

@Composable
fun DemoScreen(vm: MainViewModel) {
    val s by vm.state.collectAsState()
    val pickImage = rememberLauncherForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri ->
        if (uri != null) vm.loadImage(uri)
    }
    val takePhoto = rememberLauncherForActivityResult(ActivityResultContracts.TakePicturePreview()) { bmp ->
        if (bmp != null) vm.setImage(bmp)
    }
    var menuOpen by remember { mutableStateOf(false) }

    Column(
        Modifier.fillMaxSize().padding(16.dp).verticalScroll(rememberScrollState()),
        verticalArrangement = Arrangement.spacedBy(12.dp),
    ) {
        Text("edgemm demo", style = MaterialTheme.typography.headlineSmall)

        // Bundle: pushed with adb into vm.bundlesDir (see docs/apps.md).
        if (s.bundles.isEmpty()) {
            Text("No bundle found. Push one with:\nadb push BUNDLE ${vm.bundlesDir.absolutePath}/demo",
                fontFamily = FontFamily.Monospace)
            OutlinedButton(onClick = vm::refreshBundles) { Text("Look again") }
        } else {
            Row(verticalAlignment = Alignment.CenterVertically, horizontalArrangement = Arrangement.spacedBy(8.dp)) {
                OutlinedButton(onClick = { menuOpen = true }) { Text(s.bundle?.name ?: "choose a bundle") }
                DropdownMenu(expanded = menuOpen, onDismissRequest = { menuOpen = false }) {
                    s.bundles.forEach { f ->
                        DropdownMenuItem(text = { Text(f.name) }, onClick = { vm.selectBundle(f); menuOpen = false })
                    }
                }
                Button(onClick = vm::loadBundle, enabled = !s.loading && !s.running) {
                    Text(if (s.loading) "Loading…" else "Load")
                }
            }
            Row(verticalAlignment = Alignment.CenterVertically, horizontalArrangement = Arrangement.spacedBy(8.dp)) {
                Text("threads ${s.threads}")
                OutlinedButton(onClick = { vm.setThreads(s.threads - 1) }) { Text("−") }
                OutlinedButton(onClick = { vm.setThreads(s.threads + 1) }) { Text("+") }
                Text("NPU lane")
                Switch(checked = s.npuLane, onCheckedChange = vm::setNpuLane)
            }
            s.engineInfo?.let { Text(it, style = MaterialTheme.typography.bodySmall) }
        }

        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            OutlinedButton(onClick = {
                pickImage.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly))
            }) { Text("Gallery") }
            OutlinedButton(onClick = { takePhoto.launch(null) }) { Text("Camera") }
            if (s.image != null) OutlinedButton(onClick = { vm.setImage(null) }) { Text("No image") }
        }
        s.image?.let {
            Image(it.asImageBitmap(), contentDescription = "the picture", modifier = Modifier.size(224.dp),
                contentScale = ContentScale.Fit)
        }

        OutlinedTextField(
            value = s.question, onValueChange = vm::setQuestion, modifier = Modifier.fillMaxWidth(),
            label = { Text("Question") }, singleLine = true,
        )
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            Button(onClick = vm::ask, enabled = s.engineInfo != null && !s.running && s.question.isNotBlank()) { Text("Ask") }
            if (s.running) OutlinedButton(onClick = vm::stop) { Text("Stop") }
        }

        if (s.answer.isNotEmpty() || s.running) {
            Text(s.answer + if (s.running) "▌" else "", style = MaterialTheme.typography.titleLarge)
        }
        s.stats?.let { StatsView(it) }
        s.error?.let { Text(it, color = MaterialTheme.colorScheme.error) }
        Spacer(Modifier.height(24.dp))
    }
}

@Composable
fun StatsView(st: AnswerStats) {
    Column(verticalArrangement = Arrangement.spacedBy(2.dp)) {
        val mono = FontFamily.Monospace
        Text("time to first token  %.1f ms".format(st.ttftMs), fontFamily = mono)
        Text("prefill  %d tok in %.1f ms = %.0f tok/s".format(st.prefillTokens, st.prefillMs, st.prefillTokPerS), fontFamily = mono)
        Text("decode   %d tok in %.1f ms = %.1f tok/s".format(st.decodeTokens, st.decodeMs, st.decodeTokPerS), fontFamily = mono)
        Text("image encode %.1f ms · %d visual tokens".format(st.imageEncodeMs, st.visualTokens), fontFamily = mono)
        if (st.npuLaneBusy > 0) Text("lanes busy: NPU %.0f%% · CPU %.0f%%".format(100 * st.npuLaneBusy, 100 * st.cpuLaneBusy), fontFamily = mono)
        if (st.cancelled) Text("(stopped)", fontFamily = mono)
    }
}
