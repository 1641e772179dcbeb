import SwiftUI

@main
struct EdgemmDemoApp: App {
    @StateObject private var host = EngineHost()

    var body: some Scene {
        WindowGroup {
            ContentView(host: host)
                .onAppear { host.refreshBundles() }
        }
    }
}
