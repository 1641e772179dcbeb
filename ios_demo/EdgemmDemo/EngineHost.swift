// Runs the Engine on one serial queue and publishes its state to SwiftUI on the main thread.
// (No edgemm_* calls here: they all live in Engine.swift.)

import Foundation
import SwiftUI
import UIKit

/// The engine and the picture it has encoded; touched only on `queue`.
final class EngineWorker: @unchecked Sendable {
    let queue = DispatchQueue(label: "edgemm.engine", qos: .userInitiated)
    var engine: Engine?
    var imageSent: UIImage?
}

final class EngineHost: ObservableObject {
    // Published state: changed on the main thread only.
    @Published var bundles: [URL] = []
    @Published var bundle: URL?
    @Published var threads: Int = 4
    @Published var npuLane = true // the two-lane W8A8 prefill: much faster on W8A8 bundles (docs/apps.md)
    @Published var loading = false
    @Published var engineInfo: String?
    @Published var image: UIImage?
    @Published var question = ""
    @Published var answer = ""
    @Published var running = false
    @Published var stats: AnswerStats?
    @Published var error: String?

    private let worker = EngineWorker()
    private var sink: TokenSink?

    /// Bundles: folders with manifest.json in Documents (Finder / Files app file sharing) or inside the app.
    var documents: URL { FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0] }

    func refreshBundles() {
        var found: [URL] = []
        let fm = FileManager.default
        for root in [documents, Bundle.main.resourceURL].compactMap({ $0 }) {
            let items = (try? fm.contentsOfDirectory(at: root, includingPropertiesForKeys: nil)) ?? []
            found += items.filter { fm.fileExists(atPath: $0.appendingPathComponent("manifest.json").path) }
        }
        bundles = found.sorted { $0.lastPathComponent < $1.lastPathComponent }
        if bundle == nil { bundle = bundles.first }
    }

    func load() {
        guard let url = bundle else { return }
        loading = true
        error = nil
        engineInfo = nil
        let threads = Int32(threads), npu = npuLane, worker = worker
        worker.queue.async {
            worker.engine = nil // frees the previous session and model (Engine.deinit)
            worker.imageSent = nil
            let result = Result { try Engine(bundlePath: url.path, threads: threads, npuLane: npu) }
            if case .success(let e) = result { worker.engine = e }
            let version = Engine.version().version
            DispatchQueue.main.async {
                self.loading = false
                switch result {
                case .success: self.engineInfo = "\(url.lastPathComponent) · engine \(version)"
                case .failure(let e): self.error = "\(e)"
                }
            }
        }
    }

    func ask() {
        let q = question.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !q.isEmpty, !running else { return }
        running = true
        answer = ""
        stats = nil
        error = nil
        let picture = image, worker = worker
        var first = true
        let sink = TokenSink { piece in
            // The answer follows "ASSISTANT:": drop the leading space of the first piece.
            let text = first ? String(piece.drop(while: { $0 == " " })) : piece
            if !text.isEmpty { first = false }
            DispatchQueue.main.async { self.answer += text }
        }
        self.sink = sink
        worker.queue.async {
            do {
                guard let engine = worker.engine else {
                    throw EdgemmError(status: 1, name: "not loaded", message: "load a bundle first")
                }
                if picture !== worker.imageSent { // the engine re-encodes only when the picture changes
                    if let cg = picture.flatMap(EngineHost.uprightCGImage) { try engine.setImage(cg) } else { try engine.clearImage() }
                    worker.imageSent = picture
                }
                let st = try engine.generate(q, settings: GenerateSettings(), sink: sink)
                DispatchQueue.main.async { self.running = false; self.stats = st }
            } catch {
                DispatchQueue.main.async { self.running = false; self.error = "\(error)" }
            }
        }
    }

    func stop() { sink?.stop() }

    /// The picture as the user sees it (EXIF orientation applied), as a CGImage.
    static func uprightCGImage(_ image: UIImage) -> CGImage? {
        if image.imageOrientation == .up, let cg = image.cgImage { return cg }
        let format = UIGraphicsImageRendererFormat()
        format.scale = 1
        return UIGraphicsImageRenderer(size: image.size, format: format).image { _ in image.draw(at: .zero) }.cgImage
    }
}
