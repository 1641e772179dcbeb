// One screen: bundle, picture (photo library or camera), question, streamed answer, timings.

import PhotosUI
import SwiftUI
import UIKit

struct ContentView: View {
    @ObservedObject var host: EngineHost
    @State private var pickerItem: PhotosPickerItem?
    @State private var showCamera = false

    var body: some View {
        NavigationStack {
            Form {
                Section("Bundle") {
                    if host.bundles.isEmpty {
                        Text("No bundle found. Copy an `edgemm export … --target ios` folder into this app's Documents (Finder → iPhone → Files), or add it to the app target. See docs/apps.md.")
                            .font(.footnote)
                        Button("Look again") { host.refreshBundles() }
                    } else {
                        Picker("Bundle", selection: $host.bundle) {
                            ForEach(host.bundles, id: \.self) { Text($0.lastPathComponent).tag(Optional($0)) }
                        }
                        Stepper("Threads: \(host.threads)", value: $host.threads, in: 1...8)
                        Toggle("NPU lane (W8A8 prefill scheduler)", isOn: $host.npuLane)
                        Button(host.loading ? "Loading…" : "Load") { host.load() }
                            .disabled(host.loading || host.running)
                        if let info = host.engineInfo { Text(info).font(.caption) }
                    }
                }

                Section("Picture") {
                    HStack {
                        PhotosPicker("Photo library", selection: $pickerItem, matching: .images)
                        Spacer()
                        if UIImagePickerController.isSourceTypeAvailable(.camera) {
                            Button("Camera") { showCamera = true }
                        }
                        if host.image != nil {
                            Spacer()
                            Button("No picture", role: .destructive) { host.image = nil }
                        }
                    }
                    .buttonStyle(.borderless)
                    if let img = host.image {
                        Image(uiImage: img).resizable().scaledToFit().frame(maxHeight: 240)
                    }
                }

                Section("Question") {
                    TextField("what color is the circle?", text: $host.question)
                        .textInputAutocapitalization(.never)
                        .onSubmit { host.ask() }
                    HStack {
                        Button("Ask") { host.ask() }
                            .disabled(host.engineInfo == nil || host.running || host.question.isEmpty)
                        if host.running {
                            Spacer()
                            Button("Stop", role: .destructive) { host.stop() }
                        }
                    }
                    .buttonStyle(.borderless)
                }

                if !host.answer.isEmpty || host.running {
                    Section("Answer") {
                        Text(host.answer + (host.running ? "▌" : "")).font(.title2)
                    }
                }
                if let st = host.stats {
                    Section("Timings") { StatsView(st: st) }
                }
                if let err = host.error {
                    Section { Text(err).foregroundStyle(.red) }
                }
            }
            .navigationTitle("edgemm demo")
        }
        .onChange(of: pickerItem) { item in
            Task {
                if let data = try? await item?.loadTransferable(type: Data.self), let img = UIImage(data: data) {
                    await MainActor.run { host.image = img }
                }
            }
        }
        .sheet(isPresented: $showCamera) {
            CameraPicker { img in host.image = img }
        }
    }
}

struct StatsView: View {
    let st: AnswerStats

    var body: some View {
        VStack(alignment: .leading, spacing: 4) {
            Text(String(format: "time to first token  %.1f ms", st.ttftMs))
            Text(String(format: "prefill  %d tok in %.1f ms = %.0f tok/s", st.prefillTokens, st.prefillMs, st.prefillTokPerS))
            Text(String(format: "decode   %d tok in %.1f ms = %.1f tok/s", st.decodeTokens, st.decodeMs, st.decodeTokPerS))
            Text(String(format: "image encode %.1f ms · %d visual tokens", st.imageEncodeMs, st.visualTokens))
            if st.npuLaneBusy > 0 {
                Text(String(format: "lanes busy: NPU %.0f%% · CPU %.0f%%", 100 * st.npuLaneBusy, 100 * st.cpuLaneBusy))
            }
            if st.cancelled { Text("(stopped)") }
        }
        .font(.system(.footnote, design: .monospaced))
    }
}

/// The system camera (UIImagePickerController) as a SwiftUI sheet.
struct CameraPicker: UIViewControllerRepresentable {
    let onImage: (UIImage) -> Void
    @Environment(\.dismiss) private var dismiss

    func makeUIViewController(context: Context) -> UIImagePickerController {
        let c = UIImagePickerController()
        c.sourceType = .camera
        c.delegate = context.coordinator
        return c
    }

    func updateUIViewController(_ controller: UIImagePickerController, context: Context) {}

    func makeCoordinator() -> Coordinator { Coordinator(self) }

    final class Coordinator: NSObject, UIImagePickerControllerDelegate, UINavigationControllerDelegate {
        let parent: CameraPicker
        init(_ parent: CameraPicker) { self.parent = parent }

        func imagePickerController(_ picker: UIImagePickerController,
                                   didFinishPickingMediaWithInfo info: [UIImagePickerController.InfoKey: Any]) {
            if let img = info[.originalImage] as? UIImage { parent.onImage(img) }
            parent.dismiss()
        }

        func imagePickerControllerDidCancel(_ picker: UIImagePickerController) { parent.dismiss() }
    }
}
